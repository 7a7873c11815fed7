"""The one interface the training loop reads of its data, map-style or streamed."""


class TrainingData:
    """Data the training loop (`training/loop.py`) reads: `ImageTextPairs`, `TaskExamples` and `RetrievalGrid`
    (map-style) or `StreamingPairs` (a stream of batches).

    `set_epoch` is torch's protocol (`DistributedSampler.set_epoch`, which accelerate calls on samplers): the loop
    calls it on the data at each epoch, and every item carries it (`item["epoch"]`), so a collator draws an
    example's masks and negatives from (seed, epoch, index) with no state of its own, in DataLoader workers as in
    the main process.
    """

    epoch = 0
    streamed = False  # a stream is this process's part already: accelerate must not split it again

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_examples(self) -> int:
        """Examples of one epoch, every process together."""
        return len(self)

    def finish_batch(self, batch: dict, device=None) -> dict:
        """The model's inputs from a batch the collator made (in a DataLoader worker or here), on `device` when
        given: the batch itself by default (the DataLoader moved it); `ImageTextPairs` gathers the region features."""
        return batch

    def batches_per_epoch(self, loader) -> int:
        """Batches of one epoch, every process together, from the DataLoader before accelerate prepares it:
        what sizes the schedule."""
        return len(loader)


def training_data(loader) -> TrainingData:
    """The data of a training DataLoader, refused with its type when it is not a `TrainingData`."""
    if not isinstance(loader.dataset, TrainingData):
        raise TypeError(f"training reads a TrainingData (training/data/epochs.py), got {type(loader.dataset).__name__}")
    return loader.dataset

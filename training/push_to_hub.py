"""Upload a finished training folder to the Hub, after checking it is complete (`hub.hub_files`).

    python -m cmal.training.push_to_hub outputs/cmal-vqa me/cmal-small-vqa [--private]   # me: your namespace

The same upload `pretrain.py`/`finetune.py --push_to_hub` do at the end of a run, for a folder trained
without it; the model card is rendered again for the repo as the Hub names it (`owner/name`). Log in first
(`hf auth login`) or set `HF_TOKEN`.
"""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="A folder written by pretrain.py or finetune.py.")
    parser.add_argument("repo_id", help="user/name of the model repo (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--commit_message", default=None)
    args = parser.parse_args(argv)
    from cmal.training.hub import push_to_hub  # torch and transformers: after parsing, so --help answers at once

    info = push_to_hub(args.folder, args.repo_id, private=args.private or None, commit_message=args.commit_message)
    print(info.commit_url)


if __name__ == "__main__":
    main()

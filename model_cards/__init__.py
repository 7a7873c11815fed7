"""Model cards (README.md) of CMAL checkpoints: one template per checkpoint kind (`templates/`) and the renderer
that fills them from a run's config, arguments and measured results (`model_cards.render`, also a CLI:
`python -m cmal.model_cards.render FOLDER`)."""

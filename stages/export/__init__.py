"""The export stage: a checkpoint in open_clip's Hub layout with a model card, optionally pushed to the Hub."""

"""The trainer: consumes fine-tuning triggers, fine-tunes the served model on a window of the events topics,
judges it on the window's newest slice and promotes it (a ModelUpdate the workers act on) only if it is
better; the model registry keeps every version's lineage, window, figures and status."""

"""Training one run: the loop (``loop.train``), the step (``step.TrainStep``), optimizers, runtime choices,
distributed helpers and the progress display. Imports nothing eagerly: ``normlab.train.loop`` pulls in
data, models and plotting, which a caller of the helpers alone does not need."""

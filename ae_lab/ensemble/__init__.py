"""Sweeps as ensembles: the jobs of a sweep that differ only in per-member scalars train as one
vectorised ensemble (stacked parameters, one batched forward and backward through `torch.func`), and
each member is then written out as an ordinary run folder. See `grouping.group_jobs` for which keys
vectorise, `group.train_group` for the training, `optim.StackedOptimizer` for the per-member optimiser.
"""

"""Training of value networks (torch is imported by the submodules, never by this file, so
`ivl_local.train.config` and `ivl_local.train.basefile` stay cheap to import).

Entry points: ivl_local.train.api.train(cfg) and default_recipe(out_dir); TrainConfig in
ivl_local.train.config.
"""

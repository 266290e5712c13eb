"""The training engine (nothing here sees argparse).

``fit`` (:mod:`.fit`: a short sequence of calls on a :class:`~.fit.Trainer`), the per-epoch loops
(:mod:`.loop`), the run's data and loaders (:mod:`.data`), building the device and model
(:mod:`.build`), every output file and the resume checks (:mod:`.run_dir`), the optimizer and
schedule (:mod:`.optim`), policy statistics, precise BN and gate telemetry. Kept import-light:
import the submodules.
"""

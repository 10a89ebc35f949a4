"""adainfer: Llama- and OPT-family decoders whose block loop stops early when a small exit classifier says the answer
will not change (AdaInfer, arXiv 2403.02181).

    import adainfer

    engine = adainfer.load()                                   # None: the embedded default model
    results = engine.generate(["Q: a charming, funny film\\nA:"])  # list[Result]: text, token ids, layers, seconds
    clf = adainfer.calibrate(engine, tasks=["sst2"])             # an ExitClassifier fitted on the train split
    report = adainfer.evaluate(engine, "sst2", ["dense", "svm", "oracle"], limit=100)

The command-line tools (python -m adainfer.run / .calibrate / .eval, python -m weights_convert) are thin wrappers
over these calls, with the same defaults.
"""

from adainfer.calibration import CalibrationSet, calibrate, calibration_set
from adainfer.engine import Engine, ExitChoice, Result, load
from adainfer.errors import AdainferError
from adainfer.eval.harness import Results, evaluate
from adainfer.exit import ExitClassifier
from adainfer.generate import Sampling

__all__ = ["AdainferError", "CalibrationSet", "Engine", "ExitChoice", "ExitClassifier", "Result", "Results",
           "Sampling", "calibrate", "calibration_set", "evaluate", "load"]

"""The onnxruntime import helper, owned by the contract package; kept here for ``runtimes.ort_env`` imports."""

from contract.ort_env import import_onnxruntime, stub_training_package, training_folder  # noqa: F401

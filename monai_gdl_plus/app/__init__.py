"""The application layer: the ``gdl-plus`` command line, its data, the bundle configs and the benchmark harness.

It imports the library (:mod:`monai_gdl_plus`); the library never imports it, so ``import monai_gdl_plus`` loads
none of this (nor matplotlib or TensorBoard, which only the demo and the handler's writers need).
"""

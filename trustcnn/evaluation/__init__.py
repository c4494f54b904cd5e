"""Post-hoc evaluation of trained runs (``python -m trustcnn.evaluate``, the command line in
:mod:`trustcnn.evaluate`): :mod:`~trustcnn.evaluation.run` (one Lightning test pass per model),
:mod:`~trustcnn.evaluation.module` (the test pass: the metrics of one model), :mod:`~trustcnn.evaluation.output`
(``evaluation.json`` and ``evaluation.md``)."""

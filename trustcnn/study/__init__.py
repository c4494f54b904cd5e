"""The paper's user experiment (§4.2.1) as a tool: build a study from trained runs, serve it, analyze the votes.

``python -m trustcnn.study build``: sample test images and write a self-contained study directory
(:mod:`trustcnn.study.build`, layout in :mod:`trustcnn.study.manifest`).
``python -m trustcnn.study serve``: the local web app that asks the questions (:mod:`trustcnn.study.app`).
``python -m trustcnn.study analyze``: the paper's Table 3 and more from the votes (:mod:`trustcnn.study.analyze`).
"""

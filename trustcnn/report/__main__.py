"""``python -m trustcnn.report <sweep dir>`` (see :mod:`trustcnn.report.cli`)."""

import logging

from trustcnn.report.cli import main

logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
main()

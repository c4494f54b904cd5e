"""trustcnn: CNNs whose saliency maps you can trust (arXiv 2009.14260)."""

from trustcnn.loggers import register_resolvers as _register_logger_resolvers
from trustcnn.sweep import register_resolvers as _register_resolvers

# ${trustcnn.direction:...} (the sweepers' direction of optimized_metric) must exist before Hydra composes;
# ${trustcnn.wandb_group:...} and ${trustcnn.wandb_name:...} (conf/logger/wandb.yaml) before a config resolves.
_register_resolvers()
_register_logger_resolvers()

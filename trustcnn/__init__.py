"""trustcnn: CNNs whose saliency maps you can trust (arXiv 2009.14260)."""

from trustcnn.sweep import register_resolvers as _register_resolvers

# ${trustcnn.direction:...} (the sweepers' direction of optimized_metric) must exist before Hydra composes.
_register_resolvers()

from trustcnn.models.base import BuiltModel
from trustcnn.models.freeze import freeze_except, set_trainable_mode
from trustcnn.models.torchvision_models import mobilenet_v2_transfer, torchvision_classifier, vgg16
from trustcnn.models.weights import UnknownArchError, WeightsError, WeightsUnavailableError

"""MAC: mean-activation preconditioning for optax and Flax."""

from mac_optax._alias import mac
from mac_optax._capture import capture
from mac_optax._capture import Capture
from mac_optax._layers import find_layers
from mac_optax._layers import Layers
from mac_optax._layers import LayerSpec
from mac_optax._layers import precondition_mask
from mac_optax._layers import summary
from mac_optax._stats import all_reduce as all_reduce_stats
from mac_optax._stats import merge as merge_stats
from mac_optax._transform import precondition
from mac_optax._transform import scale_by_mac
from mac_optax._transform import ScaleByMacState

__version__ = '0.1.0'

__all__ = (
    'Capture',
    'LayerSpec',
    'Layers',
    'ScaleByMacState',
    'all_reduce_stats',
    'capture',
    'find_layers',
    'mac',
    'merge_stats',
    'precondition',
    'precondition_mask',
    'scale_by_mac',
    'summary',
)

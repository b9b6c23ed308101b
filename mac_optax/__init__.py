"""MAC: mean-activation preconditioning for optax and Flax."""

from mac_optax._accumulation import multi_steps
from mac_optax._accumulation import MultiStepsState
from mac_optax._accumulation import stats_accumulator
from mac_optax._alias import mac
from mac_optax._capture import capture
from mac_optax._capture import Capture
from mac_optax._first_layer import input_second_moments
from mac_optax._layers import find_layers
from mac_optax._geometry import Layers
from mac_optax._geometry import LayerSpec
from mac_optax._geometry import precondition_mask
from mac_optax._layers import summary
from mac_optax._presets import layer_labels
from mac_optax._presets import mac_adamw
from mac_optax._presets import preconditioned
from mac_optax._recording import recording
from mac_optax._recording import with_stats
from mac_optax._rules import AttentionRule
from mac_optax._rules import ConvLocalRule
from mac_optax._rules import ConvRule
from mac_optax._rules import ConvTransposeRule
from mac_optax._rules import DenseRule
from mac_optax._rules import EinsumRule
from mac_optax._rules import LayerCall
from mac_optax._rules import LayerRule
from mac_optax._rules import PassThrough
from mac_optax._rules import register_attention
from mac_optax._rules import register_layer
from mac_optax._rules import rule_of
from mac_optax._rules import Statistic
from mac_optax._sharding import state_sharding
from mac_optax._stats import all_reduce as all_reduce_stats
from mac_optax._stats import merge as merge_stats
from mac_optax._train_state import apply_gradients
from mac_optax._train_state import TrainState
from mac_optax._train_state import TrainStateMixin
from mac_optax._tracking import provide_attention_probabilities
from mac_optax._transform import precondition
from mac_optax._transform import scale_by_mac
from mac_optax._transform import ScaleByMacState

__version__ = '0.1.0'

__all__ = (
    'AttentionRule',
    'Capture',
    'ConvLocalRule',
    'ConvRule',
    'ConvTransposeRule',
    'DenseRule',
    'EinsumRule',
    'LayerCall',
    'LayerRule',
    'LayerSpec',
    'Layers',
    'MultiStepsState',
    'PassThrough',
    'ScaleByMacState',
    'Statistic',
    'TrainState',
    'TrainStateMixin',
    'all_reduce_stats',
    'apply_gradients',
    'capture',
    'find_layers',
    'input_second_moments',
    'layer_labels',
    'mac',
    'mac_adamw',
    'merge_stats',
    'multi_steps',
    'precondition',
    'precondition_mask',
    'provide_attention_probabilities',
    'preconditioned',
    'recording',
    'register_attention',
    'register_layer',
    'rule_of',
    'scale_by_mac',
    'state_sharding',
    'stats_accumulator',
    'summary',
    'with_stats',
)

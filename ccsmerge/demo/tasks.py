"""The demo's multi-task setup: real handwritten digits (scikit-learn's copy of
the UCI digits, 1797 images of 8x8 pixels, shipped inside the wheel), a small
network pretrained on one view of them, and eight tasks that see the digits
differently.

Each task is its own domain: a transformed view of the image (rotated,
mirrored, inverted, ...), recorded by the task's own fixed linear sensor
(a random 64 -> 256 map that shares a fifth of the pretraining sensor), and
for two tasks a different label rule. Every task has a frozen head, the
normalised class means of the pretrained network's embeddings, so all that
fine-tuning learns lives in the shared encoder weights, which are what gets
merged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SENSOR_DIM = 256  # input width of the encoder
HIDDEN = 256
EMBEDDING = 64
SHARED_SENSOR = 0.2  # share of the pretraining sensor in every task's sensor
LOGIT_SCALE = 20.0  # cosine-similarity logits, as zero-shot heads use

Transform = Callable[[torch.Tensor], torch.Tensor]  # (n, 8, 8) -> (n, 8, 8)


@dataclass(frozen=True)
class Task:
    name: str
    transform: Transform
    classes: int
    label: Callable[[torch.Tensor], torch.Tensor]


def _digit(y: torch.Tensor) -> torch.Tensor:
    return y


TASKS = (
    Task("upright", lambda x: x, 10, _digit),
    Task("rotated-90", lambda x: torch.rot90(x, 1, (1, 2)), 10, _digit),
    Task("mirrored", lambda x: torch.flip(x, (2,)), 10, _digit),
    Task("inverted", lambda x: 1.0 - x, 10, _digit),
    Task("rotated-180", lambda x: torch.rot90(x, 2, (1, 2)), 10, _digit),
    Task("transposed", lambda x: x.transpose(1, 2), 10, _digit),
    Task("parity-shifted", lambda x: torch.roll(x, 1, 2), 2, lambda y: y % 2),
    Task("mod3-upside-down", lambda x: torch.flip(x, (1,)), 3, lambda y: y % 3),
)


@dataclass
class Digits:
    images: torch.Tensor  # (n, 8, 8) in [0, 1]
    labels: torch.Tensor  # (n,) digits 0..9
    splits: dict[str, torch.Tensor]  # train / val / test indices


def load_digits(seed: int) -> Digits:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit("ccsmerge demo needs scikit-learn: pip install 'ccsmerge[demo]'") from None
    data = sklearn_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    splits = {"train": order[:1000], "val": order[1000:1300], "test": order[1300:]}
    return Digits(images, labels, splits)


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a)[0]


def sensors(seed: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The pretraining sensor and one per task, each (SENSOR_DIM, 64) with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    shared = _orthonormal(torch.randn(SENSOR_DIM, 64, generator=g))
    own = [_orthonormal(torch.randn(SENSOR_DIM, 64, generator=g)) for _ in range(count)]
    return shared, [_orthonormal(SHARED_SENSOR * shared + (1 - SHARED_SENSOR) * q) for q in own]


def init_encoder(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(HIDDEN, SENSOR_DIM), (HIDDEN, HIDDEN), (EMBEDDING, HIDDEN)]
    params = {}
    for i, (rows, cols) in enumerate(shapes):
        params[f"encoder.{i}.weight"] = torch.randn(rows, cols, generator=g) / cols**0.5
        params[f"encoder.{i}.bias"] = torch.zeros(rows)
    return params


def embed(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings of sensor readings x (n, SENSOR_DIM); with a leading task
    dimension on x and on every parameter, each task's encoder runs on its own inputs."""
    h = x
    for i in range(3):
        weight, bias = params[f"encoder.{i}.weight"], params[f"encoder.{i}.bias"]
        h = h @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
        if i < 2:
            h = torch.relu(h)
    return F.normalize(h, dim=-1)


def train(params, loss_fn, steps: int, lr: float, extra=()) -> dict[str, torch.Tensor]:
    """Full-batch Adam; returns detached copies."""
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.Adam([*params.values(), *extra], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(params).backward()
        optimiser.step()
    return {k: v.detach() for k, v in params.items()}


class Suite:
    """Data, sensors and heads of the eight tasks; trains and evaluates encoders."""

    def __init__(self, seed: int = 0, tasks=TASKS):
        self.seed = seed
        self.tasks = tasks
        self.data = load_digits(seed)
        self.pretrain_sensor, self.sensors = sensors(seed + 1, len(tasks))
        self.heads: list[torch.Tensor] = []
        self._inputs: dict[tuple[int, str], torch.Tensor] = {}  # every evaluation reads the same readings

    def inputs(self, task: int, split: str) -> torch.Tensor:
        if (task, split) not in self._inputs:
            idx = self.data.splits[split]
            images = self.tasks[task].transform(self.data.images[idx])
            self._inputs[task, split] = images.reshape(len(idx), 64) @ self.sensors[task].T
        return self._inputs[task, split]

    def labels(self, task: int, split: str) -> torch.Tensor:
        return self.tasks[task].label(self.data.labels[self.data.splits[split]])

    def pretrain(self, steps: int = 200, lr: float = 3e-3) -> dict[str, torch.Tensor]:
        """Digit classification through the pretraining sensor, with a learned head that is discarded."""
        idx = self.data.splits["train"]
        x = self.data.images[idx].reshape(len(idx), 64) @ self.pretrain_sensor.T
        y = self.data.labels[idx]
        g = torch.Generator().manual_seed(self.seed + 2)
        head = (0.1 * torch.randn(10, EMBEDDING, generator=g)).requires_grad_(True)
        encoder = train(
            init_encoder(self.seed + 3), lambda p: F.cross_entropy(10 * embed(p, x) @ head.T, y), steps, lr, [head]
        )
        self.heads = [self._class_means(encoder, t) for t in range(len(self.tasks))]
        return encoder

    def _class_means(self, encoder, task: int) -> torch.Tensor:
        e, y = embed(encoder, self.inputs(task, "train")), self.labels(task, "train")
        means = torch.stack([e[y == c].mean(0) for c in range(self.tasks[task].classes)])
        return F.normalize(means, dim=1)

    def fine_tune_all(self, encoder, steps: int = 100, lr: float = 1e-3) -> list[dict[str, torch.Tensor]]:
        """One fine-tuned copy of `encoder` per task. The copies train side by side as one
        stacked model: the summed loss gives each copy its own task's gradient, and Adam
        is elementwise, so this is T independent fine-tunes in one set of batched GEMMs."""
        count = len(self.tasks)
        x = torch.stack([self.inputs(t, "train") for t in range(count)])
        y = torch.stack([self.labels(t, "train") for t in range(count)])
        heads = torch.zeros(count, 10, EMBEDDING)
        absent = torch.ones(count, 1, 10, dtype=torch.bool)  # classes a task does not have
        for t, head in enumerate(self.heads):
            heads[t, : len(head)] = head
            absent[t, 0, : len(head)] = False
        stacked = {k: v.expand(count, *v.shape).clone() for k, v in encoder.items()}

        def loss(p):
            logits = (LOGIT_SCALE * embed(p, x) @ heads.transpose(1, 2)).masked_fill(absent, float("-inf"))
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]

        tuned = train(stacked, loss, steps, lr)
        return [{k: v[t].clone() for k, v in tuned.items()} for t in range(count)]

    @torch.no_grad()
    def correct(self, encoder, task: int, split: str) -> torch.Tensor:
        """Per-example correctness (bool) of `encoder` on one task's split."""
        logits = embed(encoder, self.inputs(task, split)) @ self.heads[task].T
        return logits.argmax(1) == self.labels(task, split)

    def accuracies(self, encoder, split: str) -> list[float]:
        return [float(self.correct(encoder, t, split).float().mean()) for t in range(len(self.tasks))]

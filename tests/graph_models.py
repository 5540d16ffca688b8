"""Small graph networks written as users write them (nn.Module classes with functional calls), shared
by the tests of graph geometry, losses, certificates and the CLI."""
import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """y = x + W2 relu(W1 x), then relu and a linear head."""

    def __init__(self, d=6, hidden=8, classes=3):
        super().__init__()
        self.inner = nn.Linear(d, hidden)
        self.back = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        y = x + self.back(F.relu(self.inner(x)))
        return self.head(torch.relu(y))


class ProjectionResidualCNN(nn.Module):
    """A conv block with a projection shortcut (1x1 conv, stride 2) and a second block added in place."""

    def __init__(self, channels=1, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(channels, 4, 1, stride=2)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = self.conv2(h)
        y += self.shortcut(x)  # an in-place sum
        y = F.relu(y)
        return self.head((y + 0.5 * y).flatten(1))


class MaxPoolCNN(nn.Module):
    """conv -> relu -> overlapping max pool with padding -> conv -> relu -> max pool -> linear."""

    def __init__(self, channels=1, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.view(x.size(0), -1))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return F.relu(x + self.fc2(F.relu(self.fc1(x))))


class NestedResidual(nn.Module):
    """Two residual blocks as submodules after a max pool over features of a conv layer."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x).flatten(1)))


def sequential_max_pool(channels=1, classes=3):
    """A plain nn.Sequential with nn.MaxPool2d (parsed as a graph)."""
    return nn.Sequential(nn.Conv2d(channels, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, classes))


#: (name, builder, per-sample input shape)
GRAPH_MODELS = [
    ("residual_mlp", ResidualMLP, (6,)),
    ("projection_residual_cnn", ProjectionResidualCNN, (1, 8, 8)),
    ("max_pool_cnn", MaxPoolCNN, (1, 8, 8)),
    ("nested_residual", NestedResidual, (1, 8, 8)),
    ("sequential_max_pool", sequential_max_pool, (1, 8, 8)),
]


def model_and_input(name, batch=4, seed=0, dtype=torch.float64):
    builder, shape = next((b, s) for n, b, s in GRAPH_MODELS if n == name)
    torch.manual_seed(seed)
    model = builder().to(dtype).eval()
    x = torch.rand((batch,) + shape, dtype=dtype)
    return model, x

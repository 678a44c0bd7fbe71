"""Data the project generates itself: Fashion-MNIST from local files and cluttered garment scenes."""
from .fashion import CLASS_NAMES, FashionMNISTNotFound, find_fashion_mnist, load_fashion_mnist
from .scenes import Scenes, make_scenes, render_scenes

__all__ = [
    "CLASS_NAMES",
    "FashionMNISTNotFound",
    "Scenes",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "make_scenes",
    "render_scenes",
]

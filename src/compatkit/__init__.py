"""compatkit: upgrade the embedding model behind a retrieval system without re-embedding first."""

__version__ = "0.1.0"

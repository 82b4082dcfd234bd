"""A trained detector on images: the Python API (``api``) and predict.py's library
(``prediction``)."""

"""qcloop: closed-loop quality control for nanoparticle synthesis from SEM images."""

__version__ = "0.1.0"

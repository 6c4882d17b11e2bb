"""GAN families. `REGISTRY` is the one explicit list of what `pipeline train --stage` accepts."""

from __future__ import annotations

from pipeline.errors import ParamsError
from pipeline.models.base import DataSpec, GANFamily
from pipeline.models.cyclegan import CycleGAN
from pipeline.models.dcgan import DCGAN
from pipeline.models.defectgan import DefectGAN
from pipeline.models.pix2pix import Pix2Pix
from pipeline.models.progan import ProGAN
from pipeline.models.stargan import StarGAN

REGISTRY: dict[str, type[GANFamily]] = {
    "dcgan": DCGAN,
    "pix2pix": Pix2Pix,
    "cyclegan": CycleGAN,
    "stargan": StarGAN,
    "progan": ProGAN,
    "defectgan": DefectGAN,
}


def family_class(name: str) -> type[GANFamily]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ParamsError(f"unknown GAN family {name!r}. Known families: {', '.join(REGISTRY)}.") from None


def family_config_class(name: str) -> type:
    return family_class(name).Config


def build_family(name: str, cfg, spec: DataSpec) -> GANFamily:
    return family_class(name)(cfg, spec)


__all__ = ["REGISTRY", "DataSpec", "GANFamily", "build_family", "family_class", "family_config_class"]

"""Similarity heads: how encoded captions and videos become [Nt, Nv] similarity matrices (`base.Head`)."""

from hvd.model.heads.base import Head, mean_frame_embedding, no_patches
from hvd.model.heads.eercf import EERCFHead
from hvd.model.heads.hcmi import HCMIHead
from hvd.model.heads.hvd import HVDHead
from hvd.model.heads.hvp import HVPHead
from hvd.model.heads.meanp import MeanPoolHead
from hvd.model.heads.xpool import XPoolHead

__all__ = ["EERCFHead", "HCMIHead", "HVDHead", "HVPHead", "Head", "MeanPoolHead", "XPoolHead", "mean_frame_embedding", "no_patches"]

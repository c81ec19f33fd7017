"""The preference family's methods, one file each (params, registration, pure objective), imported in the order
``posttrain methods`` lists them."""

from posttrain.families.preference.methods.dpo import DPOParams
from posttrain.families.preference.methods.wpo import WPOParams
from posttrain.families.preference.methods.sparsepo import SparsePOParams
from posttrain.families.preference.methods.asft_aligned import ASFTAlignedParams
from posttrain.families.preference.methods.simpo import SimPOParams
from posttrain.families.preference.methods.orpo import ORPOParams

__all__ = ["DPOParams", "WPOParams", "SparsePOParams", "ASFTAlignedParams", "SimPOParams", "ORPOParams"]

"""Machine-specific kernels, each chosen by measuring it on the machine at hand."""

from ssl_vit.ops.linear import (
    OneDNNLinear,
    onednn_linear_enabled,
    plain_linears,
    set_onednn_linear,
    use_onednn_linears,
)

__all__ = ["OneDNNLinear", "onednn_linear_enabled", "plain_linears", "set_onednn_linear", "use_onednn_linears"]

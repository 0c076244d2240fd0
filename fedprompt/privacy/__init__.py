"""Privacy: DP-SGD for soft prompts (``dp``, Opacus), d_chi text privatization, privacy attacks."""

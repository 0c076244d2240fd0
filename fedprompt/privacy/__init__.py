"""DP-SGD for soft prompts (Opacus), d_chi text privatization, privacy attacks."""

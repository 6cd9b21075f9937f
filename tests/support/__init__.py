"""Test support (not tests): ComfyUI, server, diffusers and stand-in helpers the test groups share."""

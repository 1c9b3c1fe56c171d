"""Weights from other mHC implementations: ``deepseek_v4`` (DeepSeek-V4's connections)."""

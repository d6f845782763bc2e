"""Serving what was registered: each gated engine as an MLflow Model with a chat interface
(`chat_model.py`, loaded by MLflow from code), written at registration (`package.py`)."""

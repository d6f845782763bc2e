"""Serving what was registered: each gated engine, and each adapter over its verified base, as an
MLflow Model with a chat interface (`chat.py`; the files MLflow loads from code: `chat_model.py`,
`adapter_model.py`), written at registration (`package.py`)."""

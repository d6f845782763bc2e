"""The file MLflow loads "from code" for an adapter version (see tasks/serving/chat.py)."""

import mlflow

from tasks.serving.chat import AdapterChatModel

mlflow.models.set_model(AdapterChatModel())

"""The file MLflow loads "from code" for an engine version (see tasks/serving/chat.py)."""

import mlflow

from tasks.serving.chat import FtdChatModel

mlflow.models.set_model(FtdChatModel())

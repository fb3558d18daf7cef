from tests.serving.fixtures import adapters, lively_model, mlflow_template  # noqa: F401

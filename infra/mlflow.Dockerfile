# MLflow tracking server with the PostgreSQL driver and boto3 (the official image has neither).
# The versions match requirements.lock, so clients and server speak the same MLflow.
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.44.8 psycopg2-binary==2.9.13
RUN useradd --create-home mlflow
USER mlflow
EXPOSE 5000

# The MLflow tracking server of the stack: the client's version (requirements.lock) plus the
# PostgreSQL driver and boto3 for the S3 artifact store.
FROM python:3.11.11-slim-bookworm
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.43.117
EXPOSE 5000

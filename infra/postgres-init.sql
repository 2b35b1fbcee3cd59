-- One PostgreSQL server, one database per service (run once, when the data volume is created).
CREATE DATABASE prefect OWNER fedward;
CREATE DATABASE mlflow OWNER fedward;

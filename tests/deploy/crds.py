"""Structural schemas of the operator resources deploy/k8s uses (CRDs unknown to
kubernetes-validate's bundled Kubernetes schemas).

They follow the CRDs the operators install (RabbitMQ Cluster Operator `rabbitmq.com/v1beta1`,
MongoDB Community Operator `mongodbcommunity.mongodb.com/v1`, Prometheus Operator
`monitoring.coreos.com/v1`) for the fields Canopy sets, and refuse unknown fields where the
CRD would prune them: a misspelt field would otherwise be dropped by the API server without a
word. Free-form parts of a CRD (pod templates, mongod options) stay free-form here.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_OPEN: Schema = {"type": "object"}
_STRING: Schema = {"type": "string"}
_STRINGS: Schema = {"type": "array", "items": _STRING}
_STRING_MAP: Schema = {"type": "object", "additionalProperties": _STRING}
# Prometheus Operator's duration pattern (30s, 1m, 1h30m).
_DURATION: Schema = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_QUANTITY: Schema = {"type": ["string", "integer", "number"]}
_RESOURCES: Schema = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
        "claims": {"type": "array"},
    },
}
_METADATA: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": _STRING,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_SECRET_NAME: Schema = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}


def _resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


RABBITMQ_CLUSTER = _resource(
    "rabbitmq.com/v1beta1",
    "RabbitmqCluster",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "image": _STRING,
            "imagePullSecrets": {"type": "array"},
            "service": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                    "annotations": _STRING_MAP,
                    "ipFamilyPolicy": _STRING,
                },
            },
            "persistence": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"storageClassName": _STRING, "storage": _QUANTITY},
            },
            "resources": _RESOURCES,
            "affinity": _OPEN,
            "tolerations": {"type": "array"},
            "rabbitmq": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "additionalPlugins": {
                        "type": "array",
                        "maxItems": 100,
                        "items": {"type": "string", "pattern": r"^\w+$"},
                    },
                    "additionalConfig": {"type": "string", "maxLength": 2000},
                    "advancedConfig": {"type": "string", "maxLength": 100000},
                    "envConfig": {"type": "string", "maxLength": 100000},
                    "erlangInetConfig": {"type": "string", "maxLength": 2000},
                },
            },
            "tls": _OPEN,
            "override": _OPEN,
            "skipPostDeploySteps": {"type": "boolean"},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "delayStartSeconds": {"type": "integer", "minimum": 0},
            "secretBackend": _OPEN,
            "autoEnableAllFeatureFlags": {"type": "boolean"},
        },
    },
)

MONGODB_COMMUNITY = _resource(
    "mongodbcommunity.mongodb.com/v1",
    "MongoDBCommunity",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["security", "type", "users", "version"],
        "properties": {
            "members": {"type": "integer", "minimum": 1},
            "arbiters": {"type": "integer", "minimum": 0},
            "type": {"enum": ["ReplicaSet"]},
            "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            "featureCompatibilityVersion": _STRING,
            "replicaSetHorizons": {"type": "array"},
            "additionalMongodConfig": _OPEN,
            "security": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "authentication": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["modes"],
                        "properties": {
                            "modes": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"enum": ["SCRAM", "SCRAM-SHA-256", "SCRAM-SHA-1"]},
                            },
                            "ignoreUnknownUsers": {"type": "boolean"},
                        },
                    },
                    "tls": _OPEN,
                    "roles": {"type": "array"},
                },
            },
            "users": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": [
                        "name",
                        "passwordSecretRef",
                        "roles",
                        "scramCredentialsSecretName",
                    ],
                    "properties": {
                        "name": _STRING,
                        "db": _STRING,
                        "passwordSecretRef": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {"name": _SECRET_NAME, "key": _STRING},
                        },
                        "roles": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["db", "name"],
                                "properties": {"db": _STRING, "name": _STRING},
                            },
                        },
                        "scramCredentialsSecretName": _SECRET_NAME,
                        "connectionStringSecretName": _SECRET_NAME,
                        "additionalConnectionStringConfig": _OPEN,
                    },
                },
            },
            "statefulSet": {
                "type": "object",
                "required": ["spec"],
                "properties": {"spec": _OPEN, "metadata": _OPEN},
            },
            "prometheus": _OPEN,
        },
    },
)

_SELECTOR: Schema = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": _STRING,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": _STRINGS,
                },
            },
        },
    },
}

SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector"],
        "properties": {
            "selector": _SELECTOR,
            "namespaceSelector": _OPEN,
            "jobLabel": _STRING,
            "targetLabels": _STRINGS,
            "podTargetLabels": _STRINGS,
            "sampleLimit": {"type": "integer", "minimum": 0},
            "targetLimit": {"type": "integer", "minimum": 0},
            "attachMetadata": _OPEN,
            "scrapeClass": _STRING,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": _STRING,
                        "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"},
                        "params": _OPEN,
                        "tlsConfig": _OPEN,
                        "authorization": _OPEN,
                        "basicAuth": _OPEN,
                        "bearerTokenSecret": _OPEN,
                        "followRedirects": {"type": "boolean"},
                        "enableHttp2": {"type": "boolean"},
                    },
                },
            },
        },
    },
)

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "limit": {"type": "integer"},
                        "partial_response_strategy": _STRING,
                        "query_offset": _DURATION,
                        "labels": _STRING_MAP,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["expr"],
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "properties": {
                                    "alert": _STRING,
                                    "record": _STRING,
                                    "expr": {"type": ["string", "integer"]},
                                    "for": _DURATION,
                                    "keep_firing_for": _DURATION,
                                    "labels": _STRING_MAP,
                                    "annotations": _STRING_MAP,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
)

SCHEMAS: dict[tuple[str, str], Schema] = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): RABBITMQ_CLUSTER,
    ("mongodbcommunity.mongodb.com/v1", "MongoDBCommunity"): MONGODB_COMMUNITY,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}

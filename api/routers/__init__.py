"""The API's routers, one module per resource; their URL paths mirror the module names."""

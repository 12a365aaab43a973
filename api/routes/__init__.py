"""The API's routers, one per resource, and what they share."""

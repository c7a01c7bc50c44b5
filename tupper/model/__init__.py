"""What users write: container specs and components (parsed into frozen values), and the developer SDK."""

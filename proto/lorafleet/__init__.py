"""Namespace for the lorafleet.v1 protobuf package (generated stubs live in v1/)."""

"""opc's passes, one per module. Passes import opc's IR helpers and numpy, never each other."""

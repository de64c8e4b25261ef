"""BYOC codegens (npu16, portable C). Built by the npu16 issue; nothing here yet."""

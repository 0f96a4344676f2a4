"""Released weights: conversion from timm and the authors' files, loading, export."""

